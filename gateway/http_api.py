"""The OpenAI-compatible HTTP API (FastAPI). The endpoints beyond liveness arrive with issue 5."""

from fastapi import FastAPI


def create_app() -> FastAPI:
    app = FastAPI(title="pagedserve", summary="OpenAI-compatible LLM serving")

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the gateway process answers."""
        return {"status": "ok"}

    return app
