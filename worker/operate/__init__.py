"""Operate: what people and machines watch the fleet by. The audit line, metrics,
heartbeats, the shared clock, redaction of outside text, the settings' checks and
the project's exceptions.
"""
