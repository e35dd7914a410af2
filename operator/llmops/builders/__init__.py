"""Pure functions from a custom resource to the manifests of its children (plain dicts)."""
