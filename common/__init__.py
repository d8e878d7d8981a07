"""Pieces any app may use, knowing none of them: charts, CLI and admin helpers, queries."""
