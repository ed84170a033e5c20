"""Thin adapters to the outside world. A client never decides; it does what it is told and raises."""
