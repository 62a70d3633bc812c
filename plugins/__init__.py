"""sslkit's built-in plugins (the top-level plugins/ folder, imported as sslkit_plugins)."""
