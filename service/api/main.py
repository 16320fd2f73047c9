"""All routers of the API."""
from fastapi import APIRouter

from .routes import completions, edits, generate, health, metrics, probes, state

api_router = APIRouter()
for module in (edits, generate, completions, probes, state, health, metrics):
    api_router.include_router(module.router)
