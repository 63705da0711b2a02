"""The pal-rm HTTP service: FastAPI app, request batching, Redis-held user state. No torch here."""
