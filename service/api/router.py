"""All routers of the API."""
from fastapi import APIRouter

from .routes import chat, completions, edits, export, generate, health, metrics, probes, state

api_router = APIRouter()
for module in (edits, generate, completions, chat, export, probes, state, health, metrics):
    api_router.include_router(module.router)
