"""Run configs become typed objects here."""
