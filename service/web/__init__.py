"""What every HTTP front door shares: reading a body within the limits (body), the probes and metrics routes
(health), and the errors that reach no door's code, answered in the format of the door whose path it is
(doors)."""
