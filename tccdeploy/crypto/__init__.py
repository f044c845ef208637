"""Customer-side cryptography: keys, sealed image bundles, key wrapping, canonical signing."""
