"""`lmlab bench`: measure -> nanogpt (the comparison) -> tables -> suite (the sections) -> cli."""
