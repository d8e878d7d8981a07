"""What any app of the shop may use and that knows none of them: SVG charts, a
terminal progress bar and argparse types, admin mixins, the admin's permission
rule. Imports nothing of the project.
"""
