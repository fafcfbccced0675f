"""A webhook receiver in Django (one file): verifies hookline's signature, dedupes on webhook-id.

From the checkout's folder, with hookline running (``hookline serve --dev``) and HOOKLINE_API_KEY
set (docs/quickstart.md); it prints each message it verified:

    HOOKLINE_WEBHOOK_SECRET=$(.venv/bin/hookline webhooks secret) .venv/bin/python -m django runserver 3000 --settings examples.receiver_django

In a real project, put the view in your app's views.py and its path in urls.py.
"""

from __future__ import annotations

import os

from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponseBadRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from hookline.client.webhooks import WebhookEvent, WebhookVerificationError, verify

# The settings: this module is Django's settings module (runserver --settings …), or configures
# Django itself when it is imported (by a WSGI server, or the tests).
ROOT_URLCONF = __name__
ALLOWED_HOSTS = ["*"]
SECRET_KEY = "unused"
MIDDLEWARE: list[str] = []
if os.environ.get("DJANGO_SETTINGS_MODULE") != __name__ and not settings.configured:
    settings.configure(
        ROOT_URLCONF=ROOT_URLCONF, ALLOWED_HOSTS=ALLOWED_HOSTS, SECRET_KEY=SECRET_KEY,
        MIDDLEWARE=MIDDLEWARE,
    )  # fmt: skip

received: list[WebhookEvent] = []  # stands in for your database
seen_ids: set[str] = set()


@csrf_exempt
@require_POST
def hook(request: HttpRequest) -> JsonResponse | HttpResponseBadRequest:
    secret = os.environ["HOOKLINE_WEBHOOK_SECRET"]
    try:
        event = verify(request.body, dict(request.headers), secret)
    except WebhookVerificationError:
        return HttpResponseBadRequest("bad signature")
    if event.id in seen_ids:  # delivery is at least once: a retry may repeat a message
        return JsonResponse({"status": "duplicate"})
    seen_ids.add(event.id)
    received.append(event)
    print(f"verified {event.type} of {event.data.get('id')}", flush=True)
    return JsonResponse({"status": "ok"})


urlpatterns = [path("hook", hook)]
application = get_wsgi_application()
