"""The notification domain: kinds, routing, consent, quiet hours, the fatigue cap."""
