"""Shared foundation of the omnichannel retail platform."""
