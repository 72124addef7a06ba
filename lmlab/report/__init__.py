"""Every HTML page and chart of lmlab, on one page shell and one chart style: chart (the style) -> page (the shell)
-> logs (what training wrote) -> curves, inside_page, surprisal, landscape, experiment_page -> report_page -> cli."""
