"""One APIRouter per concern: the page (and its assets and /docs), predictions, the service
(health, models), metrics. `serve.app.create_app` includes them."""
