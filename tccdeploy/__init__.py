"""tccdeploy: the Trusted Cloud Computing Platform as an agentless, declarative framework."""

__version__ = "0.1.0"
