"""The mutating admission webhook: the API server sends every Pod CREATE of an opted-in
namespace (the MutatingWebhookConfiguration's namespaceSelector, `tasklane.io/inject:
enabled`) to `POST /inject`; the answer carries a JSON Patch that adds the sidecar.

The mesh never blocks a pod: whatever the injector cannot handle (a reserved port, bad
labels) is admitted unpatched, with the reason as a warning kubectl shows. Only a request that
is not an AdmissionReview at all is refused (400), since there is no uid to answer to.

`review()` is the whole decision, pure; the aiohttp handler only parses and serialises.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web

from controlplane.errors import RuntimeFailure
from controlplane.inject.patch import WEBHOOK_PATH, make_patch
from controlplane.inject.pod import InjectError, InjectOptions, inject_pod
from controlplane.model.text import describe
from controlplane.pki import server_files

log = logging.getLogger("tasklane.webhook")

ADMISSION_API = "admission.k8s.io/v1"

# The API server shows warnings of up to this many characters whole.
MAX_WARNING = 256
# A pod is at most etcd's 1.5 MiB request; its AdmissionReview adds little.
MAX_BODY = 4 << 20
_POD = {"group": "", "version": "v1", "kind": "Pod"}


class BadReview(ValueError):
    """The body is not an AdmissionReview v1 request; str() says what is wrong."""


def review(body: object, options: InjectOptions) -> dict[str, Any]:
    """The AdmissionReview answer to one request body (parsed JSON); BadReview when it is not
    an AdmissionReview v1 request."""
    if not isinstance(body, dict):
        raise BadReview(f"expected an AdmissionReview object, got {describe(body)}")
    if body.get("apiVersion") != ADMISSION_API or body.get("kind") != "AdmissionReview":
        raise BadReview(f"expected apiVersion {ADMISSION_API} and kind AdmissionReview")
    request = body.get("request")
    if not isinstance(request, dict):
        raise BadReview(f"request: expected an object, got {describe(request)}")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview(f"request.uid: expected a non-empty string, got {describe(uid)}")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if request.get("kind") == _POD and request.get("operation") == "CREATE":
        pod = request.get("object")
        if not isinstance(pod, dict):
            raise BadReview(f"request.object: expected a Pod, got {describe(pod)}")
        response |= _admit_pod(pod, options)
    return {"apiVersion": ADMISSION_API, "kind": "AdmissionReview", "response": response}


def _admit_pod(pod: dict[str, Any], options: InjectOptions) -> dict[str, Any]:
    """The response fields for a Pod: a patch, a warning, or nothing (not meshed, opted out,
    injected already)."""
    try:
        injected = inject_pod(pod, options)
    except InjectError as exc:
        return {"warnings": [_warning(str(exc))]}
    except Exception:  # a bug here must not keep pods from starting
        log.exception("cannot inject a pod")
        return {"warnings": [_warning("internal error, see the control plane's log")]}
    if injected is None:
        return {}
    patch = json.dumps(make_patch(pod, injected), separators=(",", ":"))
    return {"patchType": "JSONPatch", "patch": base64.b64encode(patch.encode()).decode()}


def _warning(reason: str) -> str:
    text = f"tasklane sidecar not injected: {reason}"
    return text if len(text) <= MAX_WARNING else text[: MAX_WARNING - 3] + "..."


def webhook_app(options: InjectOptions) -> web.Application:
    """An aiohttp application serving POST /inject (mountable as a sub-app)."""

    async def inject(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            return web.json_response({"error": f"body is not JSON: {exc}"}, status=400)
        try:
            answer = review(body, options)
        except BadReview as exc:
            return web.json_response({"error": str(exc)}, status=400)
        response = answer["response"]
        for warning in response.get("warnings", []):
            log.warning("%s", warning)
        return web.json_response(answer)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(WEBHOOK_PATH, inject)
    return app


def server_ssl_context(tls_dir: Path) -> ssl.SSLContext:
    """TLS for the webhook from a TLS directory's server certificate (pki.server_files);
    TlsError when a file is missing or not PEM."""
    files = server_files(tls_dir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    return context


async def start_webhook(
    host: str, port: int, ssl_context: ssl.SSLContext, options: InjectOptions
) -> web.AppRunner:
    """Serve the webhook over HTTPS on host:port (0 picks a free port: see
    `runner.addresses`); stop it with `await runner.cleanup()`."""
    runner = web.AppRunner(webhook_app(options), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except OSError as exc:
        await runner.cleanup()
        raise RuntimeFailure(
            f"cannot serve the webhook on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    return runner
