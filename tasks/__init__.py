"""Prefect tasks: one module per stage, each task a few lines over a `vitflow` library call.

Importing this package sets up the process environment (telemetry off, Prefect's home in the project)
before any task module imports Prefect.
"""

from vitflow import environment

environment.set_up()
