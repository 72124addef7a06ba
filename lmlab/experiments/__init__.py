"""How language models learn, as measured experiments (`lmlab experiment loss|descent|patterns|truth`), one file each:
base (what they share) -> loss, descent, patterns, truth -> registry (running one, its result and page) -> cli."""
