"""How language models learn, as measured experiments (`lmlab experiment loss|descent|patterns`), one file each:
base (what they share) -> loss, descent, patterns -> registry (running one, its result and page) -> cli."""
