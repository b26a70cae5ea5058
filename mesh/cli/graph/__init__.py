"""Render the caller -> callee dependency graph and the ``top`` table.

Pure core: every renderer returns a string (``to_png`` alone writes a file, and needs the
optional matplotlib). ``layout`` places the picture without Graphviz (``layout.py``); ``render``
draws it as text, DOT, Mermaid, SVG or PNG and formats the ``top`` table (``render.py``).
"""

from .layout import NODE_H, Layout, Route, edge_label, layout
from .render import TOP_HEADER, to_dot, to_mermaid, to_png, to_svg, to_text, top_table

__all__ = [
    "NODE_H",
    "TOP_HEADER",
    "Layout",
    "Route",
    "edge_label",
    "layout",
    "to_dot",
    "to_mermaid",
    "to_png",
    "to_svg",
    "to_text",
    "top_table",
]
