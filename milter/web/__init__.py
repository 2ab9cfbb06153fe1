"""The technicians' web console (issue 6): quarantine review, lists, dashboard and audit log.

Served by `school-milter web` (milter.web.cli); the app is milter.web.app.create_app.
"""
