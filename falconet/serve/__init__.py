"""An OpenAI-compatible HTTP server over the engine (`falconet serve`)."""
