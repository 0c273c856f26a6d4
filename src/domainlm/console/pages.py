"""Server-rendered pages (Jinja2, autoescaped). Forms post here and carry the CSRF token; live parts of the
pages (progress, curves, log) poll the JSON API from static/console.js."""

from __future__ import annotations

import json

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import pass_context

from domainlm.console import catalog, datasets, devices, i18n, jobs, preflight, settings, sweepjob
from domainlm.console.api import dataset_summary, get_or_404, model_upload, upload
from domainlm.console.app import HERE, Conflict, Console
from domainlm.console.db import Dataset, Job, Model
from domainlm.console.security import PathError, UploadTooLarge, check_csrf, inside
from domainlm.errors import DomainLMError

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["tojson_attr"] = lambda v: json.dumps(v, ensure_ascii=False)


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 1e6:.1f} MB"


def _gb(n: int | None) -> str:
    return f"{(n or 0) / 2**30:.1f} GiB"


@pass_context
def _metric(context, key: str) -> str:
    """A metric's key as the page's language names it: the split word translated ("test accuracy")."""
    first, _, rest = str(key).partition(" ")
    return f"{context['_'](first)} {rest}" if rest and first in ("test", "dev", "valid") else str(key)


templates.env.filters["mb"] = _mb
templates.env.filters["gb"] = _gb
templates.env.filters["metric"] = _metric


def _console(request: Request) -> Console:
    return request.app.state.console


def render(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
    c = _console(request)
    _ = i18n.translator(i18n.of(request))
    context = {"csrf": c.csrf, "_": _, "lang": _.lang, "languages": i18n.LANGUAGES, "js_messages": _.js(), **context}
    return templates.TemplateResponse(request, name, context, status_code=status_code)


@router.get("/language/{code}")
def language(request: Request, code: str, next: str = "/jobs"):
    """The language switch in the header: kept in a cookie for a year, then back to the page it was pressed on."""
    if code not in i18n.LANGUAGES:
        raise HTTPException(404, f"no language {code} (one of {', '.join(i18n.LANGUAGES)})")
    target = next if next.startswith("/") and not next.startswith("//") else "/jobs"  # this console's pages only
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(i18n.COOKIE, code, max_age=365 * 24 * 3600, samesite="strict")
    return response


async def _form(request: Request) -> dict:
    """The posted form as a dict (several values of one name as a list); refused without the CSRF token."""
    form = await request.form()
    if not check_csrf(_console(request).token, form.get("csrf")):  # type: ignore[arg-type]
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    multi = {*settings.MULTI_FIELDS, "gpus"}
    return {k: (form.getlist(k) if len(form.getlist(k)) > 1 or k in multi else form.get(k)) for k in form}


@router.get("/")
def home():
    return RedirectResponse("/jobs", status_code=303)


@router.get("/jobs")
def jobs_page(request: Request, status: str = "", q: str = ""):
    c = _console(request)
    with c.sessions() as s:
        plan = c.runner.plan(s)
        rows = [c.job_summary(s, j, plan) for j in catalog.find_jobs(s, status, q)]
        any_jobs = s.query(Job).count() > 0
    return render(request, "jobs.html", jobs=rows, status=status, q=q, any_jobs=any_jobs)


@router.get("/resources")
def resources_page(request: Request):
    return render(request, "resources.html", machine=_console(request).resources())


def _form_context(request: Request, command: str, values: dict, errors: dict, meta: dict) -> dict:
    c = _console(request)
    with c.sessions() as s:
        labelled = jobs.dataset_choices(s, ("labelled",))
        documents = jobs.dataset_choices(s, ("documents", "labelled"))
        corpora = jobs.dataset_choices(s, ("corpus",))
        my_models = s.query(Model).order_by(Model.id.desc()).all()
        pretrain_jobs = [
            {"id": j.id, "name": j.name, "snapshots": len(list((c.home / j.folder).glob("step-*")))}
            for j in s.query(Job).filter(Job.command == "pretrain", Job.status == "succeeded").order_by(Job.id.desc())
        ]
    if command == "distill":  # teachers: classifiers and exports; students: encoders (the template tells them apart)
        my_models = [m for m in my_models if m.kind not in ("tokenizer",)]
    elif command == "export":  # what `domainlm export` takes: a fine-tuned transformer classifier
        my_models = [m for m in my_models if m.kind == "classifier"]
    elif command == "prepare":
        my_models = [m for m in my_models if m.kind not in ("classifier", "linear", "export")]  # tokenizers
    else:  # encoders to start from (a TF-IDF model, a vocabulary or an ONNX export cannot be)
        my_models = [m for m in my_models if m.kind not in ("linear", "tokenizer", "export")]
    specs = settings.field_specs(command)
    errors = {k: preflight.as_form_words(str(v), specs) for k, v in errors.items()}
    machine = {
        "gpus": [vars(g) for g in c.machine.gpus()],
        "cores": c.machine.cpu_count(),
        "gpu_job": command in devices.GPU_COMMANDS,
        "distributed": command in devices.DISTRIBUTED,
    }
    return {
        "command": command,
        "commands": settings.TITLES,
        "sections": settings.sections(command),
        "machine": machine,
        "presets": settings.presets(command),
        "values": values,
        "errors": errors,
        "meta": meta,
        "base_models": c.cfg.base_models,
        "missing": _not_here(c.cfg.base_models),
        "my_models": my_models,
        "labelled": labelled,
        "documents": documents,
        "corpora": corpora,
        "email_on": bool(c.cfg.smtp_host),
        "pretrain_jobs": [j for j in pretrain_jobs if j["snapshots"]],
    }


def _not_here(names: list[str]) -> set[str]:
    """Listed base models that are neither a folder nor in the local Hugging Face cache (they need the hub)."""
    from pathlib import Path

    from huggingface_hub import try_to_load_from_cache

    return {n for n in names if not Path(n).is_dir() and not isinstance(try_to_load_from_cache(n, "config.json"), str)}


@router.get("/jobs/new")
def new_job_page(request: Request, command: str = "finetune", clone: int | None = None, base: int | None = None):
    c = _console(request)
    if command not in settings.job_types():
        command = "finetune"
    values = jobs.defaults(command)
    meta = {
        "name": "",
        "description": "",
        "notify_webhook": "",
        "notify_email": "",
        "valid_mode": "split",
        "gpus_mode": "auto",
        "gpus": [],
        "processes": "1",
    }
    if clone is not None:
        with c.sessions() as s:
            job = get_or_404(s, Job, clone)
            command = job.command
            values = {**jobs.defaults(command), **jobs.clone_values(job)}
            meta.update(
                name=i18n.translator(i18n.of(request))("{name} (copy)", name=job.name),
                description=job.description,
                notify_webhook=job.notify.get("webhook", ""),
                notify_email=job.notify.get("email", ""),
                valid_mode="dev" if values.get("dev") else "split",
                processes=str(job.processes),
                gpus_mode="auto" if job.gpus is None else "pick" if job.gpus else "cpu",
                gpus=job.gpus or [],
            )
    if base is not None:
        values["model"] = f"model:{base}"
        with c.sessions() as s:
            m = get_or_404(s, Model, base)
            limit = _positions(c.home / m.path)
        if limit and "max_seq_len" in values and int(values["max_seq_len"] or 0) > limit:
            values["max_seq_len"] = limit  # the default must fit the model it starts from
    return render(request, "new_job.html", **_form_context(request, command, values, {}, meta))


def _positions(folder) -> int | None:
    """The positions a model folder takes (None: unknown), read from its config without loading weights."""
    from domainlm import checks
    from domainlm.errors import DomainLMError
    from domainlm.interop.models import peek_config

    try:
        config = peek_config(str(folder))
    except DomainLMError:
        return None
    return checks.position_limit(config) if config is not None else None


def _devices(form: dict) -> tuple[list[int] | None, int, dict]:
    """The devices section of the form: any free GPUs, the CPU only, or the GPUs ticked; the number of processes."""
    mode = form.get("gpus_mode") or "auto"
    picked = [int(g) for g in (form.get("gpus") or []) if str(g).isdigit()]
    gpus = None if mode == "auto" else [] if mode == "cpu" else picked
    errors = {}
    if mode == "pick" and not picked:
        errors["gpus"] = "tick at least one GPU, or choose any free GPU or the CPU"
    raw = str(form.get("processes") or "1").strip()
    processes = int(raw) if raw.isdigit() else 1
    if not raw.isdigit():
        errors["processes"] = f"processes: expected a whole number, got {raw!r}"
    return gpus, processes, errors


@router.post("/jobs/new")
async def create_job(request: Request):
    c = _console(request)
    form = await _form(request)
    command = form.get("command") or "finetune"
    if command not in settings.job_types():
        raise HTTPException(422, f"unknown job type {command}")
    values = jobs.form_values(command, form)
    meta = {
        k: form.get(k) or ""
        for k in ("name", "description", "notify_webhook", "notify_email", "valid_mode", "gpus_mode", "processes")
    }
    gpus, processes, device_errors = _devices(form)
    meta["gpus"] = gpus or []
    if command == "finetune":
        if meta["valid_mode"] == "dev" and not values.get("dev"):
            values.pop("dev", None)
            errors = {"dev": "choose a dev file, or split validation from the training data"}
            return render(request, "new_job.html", 422, **_form_context(request, command, form, errors, meta))
        if meta["valid_mode"] != "dev":
            values["dev"] = None
    job, errors = c.create_job(
        command,
        values,
        meta["name"],
        meta["description"],
        {"webhook": meta["notify_webhook"], "email": meta["notify_email"]},
        gpus,
        processes,
        i18n.of(request),
        device_errors,
    )
    if job is None:
        return render(request, "new_job.html", 422, **_form_context(request, command, form, errors, meta))
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: int):
    c = _console(request)
    with c.sessions() as s:
        job = get_or_404(s, Job, job_id)
        detail = c.job_detail(s, job)
        folder = c.home / job.folder
    sweep = sweepjob.report(folder) if detail["command"] == "sweep" else None
    distill = catalog.distill_report(folder) if detail["command"] == "distill" else None
    return render(
        request, "job.html", job=detail, log=c.log_tail(job), sweep=sweep, distill=distill, machine=c.resources()
    )


JOB_FILES = {"metric_vs_step.png", "pretraining_loss.png", "report.html", "table.md", "table.csv", "job.log"}


@router.get("/jobs/{job_id}/files/{name}")
def job_file(request: Request, job_id: int, name: str):
    """A sweep's plots and reports, the job's whole log (only these names, only from the job's folder)."""
    c = _console(request)
    with c.sessions() as s:
        job = get_or_404(s, Job, job_id)
    path = c.home / job.folder / name
    if name not in JOB_FILES or not path.is_file():
        raise HTTPException(404, f"job {job_id} has no file {name}")
    return FileResponse(path, filename=name if name.endswith((".md", ".csv", ".log")) else None)


@router.post("/jobs/{job_id}/{action}")
async def job_action(request: Request, job_id: int, action: str):
    c = _console(request)
    await _form(request)
    back = f"/jobs/{job_id}"
    try:
        if action == "cancel":
            c.cancel(job_id)
        elif action == "retry":
            c.retry(job_id)
        elif action in ("up", "down"):  # from the jobs list: back to it
            c.move(job_id, action)
            back = "/jobs#queue"
        else:
            raise HTTPException(404)
    except KeyError:
        raise HTTPException(404, f"job {job_id} does not exist") from None
    except Conflict:
        pass  # the page shows the job's current state, which says why
    return RedirectResponse(back, status_code=303)


MODEL_KINDS = ("base", "snapshot", "final", "classifier", "linear", "export", "tokenizer")


@router.get("/models")
def models_page(
    request: Request,
    error: str = "",
    status_code: int = 200,
    path: str = "",
    deleted: int | None = None,
    kind: str = "",
    q: str = "",
):
    """My models grouped by the job that made them (own models apart), newest first; filtered by kind and name."""
    c = _console(request)
    with c.sessions() as s:
        query = s.query(Model).order_by(Model.id.desc())
        if kind in MODEL_KINDS:
            query = query.filter(Model.kind == kind)
        if q.strip():
            query = query.filter(Model.name.ilike(f"%{q.strip()}%"))
        rows = [c.model_summary(m, s) for m in query]
        total = s.query(Model).count()
    groups: dict = {}
    for m in rows:
        key = m["job_id"] or 0
        if key not in groups:
            groups[key] = {"job_id": m["job_id"], "job_name": m["job_name"], "command": m["job_command"], "models": []}
        groups[key]["models"].append(m)
    return render(
        request,
        "models.html",
        status_code,
        models=rows,
        groups=list(groups.values()),
        total=total,
        kind=kind,
        q=q,
        kinds=MODEL_KINDS,
        add_error=error,
        add_path=path,
        deleted=deleted,
        roots=[str(c.home), *c.cfg.import_roots],
        limit_mb=c.cfg.max_upload_mb,
    )


@router.post("/models/register")
async def register_model_page(request: Request):
    c = _console(request)
    form = await _form(request)
    try:
        model = c.register_model(form.get("path") or "", form.get("name") or "")
    except (DomainLMError, PathError) as e:
        return models_page(request, str(e), 422, form.get("path") or "")
    return RedirectResponse(f"/models/{model['id']}", status_code=303)


@router.post("/models/upload")
async def upload_model_page(request: Request):
    try:
        model = await model_upload(request)
    except UploadTooLarge as e:
        return models_page(request, str(e), 413)
    except DomainLMError as e:
        return models_page(request, str(e), 422)
    return RedirectResponse(f"/models/{model['id']}", status_code=303)


@router.get("/models/compare")
def compare_page(request: Request):
    c = _console(request)
    ids = [int(i) for i in request.query_params.getlist("ids") if i.isdigit()]
    with c.sessions() as s:
        table = c.compare(s, ids)
    return render(request, "compare.html", table=table)


def _model_or_404(s, model_id: int) -> Model:
    m = s.get(Model, model_id)
    if m is None:
        raise HTTPException(404, f"model {model_id} does not exist")
    return m


@router.get("/models/{model_id}")
def model_page(request: Request, model_id: int):
    return _model_page(request, model_id)


def _model_page(request: Request, model_id: int, status_code: int = 200, **context) -> HTMLResponse:
    from domainlm.console import compare

    c = _console(request)
    with c.sessions() as s:
        m = _model_or_404(s, model_id)
        model, trained = c.model_summary(m, s), compare.settings(c.home, m, compare.model_names(s, c.home))
        per_class = compare.per_class(c.home, m)
    if model["can_try"]:
        c.preload(m)  # loads in the background while the user types, so that the first "Classify" is quick
    context = {
        "text": "",
        "results": None,
        "error": "",
        "endpoint": c.endpoints.status(model_id, metrics=False),
        "endpoint_error": "",
        **context,
    }
    return render(
        request,
        "model.html",
        status_code,
        model=model,
        trained={k: v for k, v in trained.items() if v != ""},
        per_class=per_class,
        **context,
    )


@router.get("/models/{model_id}/files/{name}")
def model_file(request: Request, model_id: int, name: str):
    """A classifier's confusion matrix image (only these names, only from its run folder)."""
    from domainlm.console import compare

    c = _console(request)
    with c.sessions() as s:
        m = _model_or_404(s, model_id)
        run = compare.run_folder(c.home, m) if m.kind in ("classifier", "linear") else None
    if run is None or name not in ("test_confusion.png", "dev_confusion.png") or not (run / name).is_file():
        raise HTTPException(404, f"model {model_id} has no file {name}")
    return FileResponse(inside(c.home, run / name))


@router.post("/models/{model_id}/try")
async def try_model(request: Request, model_id: int):
    c = _console(request)
    form = await _form(request)
    text = form.get("text") or ""
    with c.sessions() as s:
        m = _model_or_404(s, model_id)
    try:
        results, error = c.predict(m, text.splitlines()), ""
    except DomainLMError as e:
        results, error = None, str(e)
    return _model_page(request, model_id, 422 if error else 200, text=text, results=results, error=error)


@router.post("/models/{model_id}/endpoint/{action}")
async def endpoint_action(request: Request, model_id: int, action: str):
    c = _console(request)
    await _form(request)
    if action == "start":
        try:
            c.start_endpoint(model_id)
        except KeyError:
            raise HTTPException(404, f"model {model_id} does not exist") from None
        except DomainLMError as e:
            return _model_page(request, model_id, 409, endpoint_error=str(e))
    elif action == "stop":
        c.endpoints.stop(model_id)
    else:
        raise HTTPException(404)
    return RedirectResponse(f"/models/{model_id}#ship", status_code=303)


@router.get("/models/{model_id}/delete")
def delete_confirm(request: Request, model_id: int):
    c = _console(request)
    with c.sessions() as s:
        model = c.model_summary(_model_or_404(s, model_id))
        users = s.query(Job).filter(Job.base_model_id == model_id).count()
    return render(request, "delete.html", model=model, users=users, error="")


@router.post("/models/{model_id}/delete")
async def delete_model(request: Request, model_id: int):
    c = _console(request)
    await _form(request)
    try:
        c.delete_model(model_id)
    except KeyError:
        raise HTTPException(404, f"model {model_id} does not exist") from None
    except (Conflict, PathError) as e:
        with c.sessions() as s:
            model = c.model_summary(_model_or_404(s, model_id))
        return render(request, "delete.html", 409, model=model, users=0, error=str(e))
    return RedirectResponse(f"/models?deleted={model_id}", status_code=303)


@router.get("/datasets")
def datasets_page(request: Request):
    return _datasets_page(request)


def _datasets_page(request: Request, status_code: int = 200, error: str = "", **context) -> HTMLResponse:
    """The list of datasets, newest first, with an upload's or a registration's error where there is one."""
    c = _console(request)
    with c.sessions() as s:
        rows = [dataset_summary(d) for d in s.query(Dataset).order_by(Dataset.id.desc())]
    return render(
        request, "datasets.html", status_code, datasets=rows, error=error, limit_mb=c.cfg.max_upload_mb, **context
    )


@router.post("/datasets")
async def upload_page(request: Request):
    try:
        record = await upload(request)
        return RedirectResponse(f"/datasets/{record.id}", status_code=303)
    except UploadTooLarge as e:
        return _datasets_page(request, 413, str(e))
    except DomainLMError as e:
        return _datasets_page(request, 422, str(e))


@router.post("/datasets/register")
async def register_dataset_page(request: Request):
    c = _console(request)
    form = await _form(request)
    try:
        record = c.register_dataset(
            form.get("path") or "", {k: form.get(k) or "" for k in ("name", "text_column", "label_column", "task")}
        )
        return RedirectResponse(f"/datasets/{record.id}", status_code=303)
    except (DomainLMError, PathError) as e:
        return _datasets_page(request, 422, register_error=str(e), register_path=form.get("path") or "")


@router.get("/datasets/{dataset_id}")
def dataset_page(request: Request, dataset_id: int):
    return _dataset_page(request, dataset_id)


def _dataset_page(request: Request, dataset_id: int, status_code: int = 200, delete_error: str = "") -> HTMLResponse:
    c = _console(request)
    with c.sessions() as s:
        d = get_or_404(s, Dataset, dataset_id)
        summary = dataset_summary(d)
    path = inside(c.home, d.path)
    return render(
        request,
        "dataset.html",
        status_code,
        dataset=summary,
        stats=catalog.read_json(path / "stats.json"),
        preview=datasets.preview(path),
        delete_error=delete_error,
    )


@router.post("/datasets/{dataset_id}/delete")
async def delete_dataset(request: Request, dataset_id: int):
    c = _console(request)
    form = await _form(request)
    if form.get("confirm") != "true":
        return _dataset_page(request, dataset_id, 422, "tick the box to confirm: deleting removes the files")
    with c.sessions() as s:
        d = get_or_404(s, Dataset, dataset_id)
        try:
            datasets.delete(s, c.home, d)
        except (DomainLMError, PathError) as e:
            return _dataset_page(request, dataset_id, 409, str(e))
        s.commit()
    return RedirectResponse("/datasets", status_code=303)


@router.get("/docs")
def api_docs(request: Request):
    """Every API route from the OpenAPI document: method, path, summary, parameters, body and responses."""
    spec = request.app.openapi()
    routes = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {})
            schema = next(iter(body.values()), {}).get("schema", {}) if body else {}
            routes.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "summary": op.get("summary", ""),
                    "description": op.get("description", ""),
                    "params": [(p["name"], p["in"], p.get("required", False)) for p in op.get("parameters", [])],
                    "body": schema.get("$ref", "").rsplit("/", 1)[-1] or ("form or file" if body else ""),
                    "responses": sorted(op.get("responses", {})),
                }
            )
    schemas = {
        name: {k: v.get("description", v.get("type", "")) for k, v in s.get("properties", {}).items()}
        for name, s in spec.get("components", {}).get("schemas", {}).items()
        if not name.startswith(("HTTP", "Validation"))
    }
    return render(request, "docs.html", routes=routes, schemas=schemas, info=spec["info"])
