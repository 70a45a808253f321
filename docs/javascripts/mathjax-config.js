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

document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
