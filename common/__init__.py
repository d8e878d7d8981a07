"""Pieces any app may use, knowing none of them: SVG charts, CLI helpers, admin mixins."""
