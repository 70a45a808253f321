// MathJax 3 for pymdownx.arithmatex (generic mode), as mkdocs-material documents it. The MathJax files themselves
// are copied into the site by docs/hooks.py from the `django-static-mathjax` wheel (the docs extra), so math
// renders without the internet.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// No `document$.subscribe(...)` re-typesetting as in Material's example: it serves instant navigation, which this
// site does not use (every page is a full load, typeset by MathJax's own start-up), and MathJax 3.2's clearCache()
// there leaves the formulas without their glyphs' styles: invisible math (seen in docs/check_in_browser.sh).
