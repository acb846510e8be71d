"""Text form of a plan report (the JSON form is the dict itself)."""
from __future__ import annotations
import json
def format_report(r):
    return json.dumps(r, indent=1)
def format_fit(r):
    return json.dumps(r, indent=1)
