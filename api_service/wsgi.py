"""WSGI entry point for gunicorn: ``gunicorn api_service.wsgi:app``."""
from api_service import create_app

app = create_app()
