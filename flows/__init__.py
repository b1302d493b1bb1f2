"""Prefect flows: they only chain the tasks in `tasks/`.

Importing this package sets up the process environment before Prefect is imported.
"""

from vitflow import environment

environment.set_up()
