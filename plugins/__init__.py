"""Built-in plugins. Each imports only adapterfmt's public API, exactly as a third-party plugin would."""
