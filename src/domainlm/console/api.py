"""The JSON API behind every page (OpenAPI at /docs). Errors: 422 {"errors": {field: message}} for bad options
(or {"detail": [...]} for a parameter or body of the wrong shape), 404 for unknown ids and server paths that do not
exist, 403 for a path outside the folders the console may read (and a missing CSRF token), 409 for a request the
current state does not allow, 413 for an upload over the limit, 401 without the token. Every one is declared in the
OpenAPI document, and ids are checked against what the database holds (1 to 2^63 - 1) before it is asked."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Security
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from domainlm.console import catalog, datasets, i18n, settings, ship
from domainlm.console.app import Conflict, Console
from domainlm.console.db import Dataset, Job, Model
from domainlm.console.jobs import slug
from domainlm.console.security import PathError, UploadTooLarge, check_csrf, inside, receive_upload
from domainlm.errors import DomainLMError

MAX_ID = 2**63 - 1  # SQLite's INTEGER; a larger id is refused (422) before the database is asked


class Problem(BaseModel):
    """Every error answer: `detail` (a sentence, or FastAPI's list for a parameter of the wrong shape) or `errors`
    (each bad field of the request and why)."""

    detail: str | list[dict[str, Any]] | None = None
    errors: dict[str, str] | None = None


def _answers(*codes: int) -> dict:
    meaning = {
        400: "a body that is not JSON",
        401: "missing or wrong token",
        403: "a path outside the folders the console may read, or a missing CSRF token (cookie sessions)",
        404: "no such id, or a server path that does not exist",
        409: "not in the current state",
        413: "the upload is over --max-upload-mb",
        422: "invalid options",
    }
    return {code: {"model": Problem, "description": meaning[code]} for code in codes}


# the token: `Authorization: Bearer TOKEN` (the browser's pages use a cookie); checked by security.TokenAuth
router = APIRouter(
    prefix="/api",
    responses=_answers(400, 401, 403),
    dependencies=[Security(HTTPBearer(auto_error=False, description="the token `domainlm console` printed"))],
)
JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="a job's id")]
ModelId = Annotated[int, Path(ge=1, le=MAX_ID, description="a model's id")]
DatasetId = Annotated[int, Path(ge=1, le=MAX_ID, description="a dataset's id")]


def _console(request: Request) -> Console:
    return request.app.state.console


def get_or_404(s, cls, ident: int):
    obj = s.get(cls, ident)
    if obj is None:
        raise HTTPException(404, f"{cls.__tablename__[:-1]} {ident} does not exist")
    return obj


def _invalid(errors: dict, status: int = 422) -> JSONResponse:
    return JSONResponse({"errors": errors}, status_code=status)


def _path_problem(e: Exception, field: str = "path") -> JSONResponse:
    """A server path: outside the allowed folders 403, not there 404, there but not usable 422."""
    from domainlm.console.imports import Missing

    status = 403 if isinstance(e, PathError) else 404 if isinstance(e, Missing) else 422
    return _invalid({field: str(e)}, status)


class Notify(BaseModel):
    webhook: str | None = Field(None, description="URL that receives a signed JSON POST on each job event")
    email: str | None = Field(None, description="address that receives an e-mail on each job event (needs --smtp-host)")


Command = Literal[tuple(settings.job_types())]  # type: ignore[valid-type]


class JobCreate(BaseModel):
    command: Command = Field(
        description="the `domainlm` command the job runs: finetune, pretrain, prepare, sweep, "
        "export, distill; GET /api/schema/COMMAND lists its options"
    )
    name: str = ""
    description: str = ""
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="the command's options (as in its YAML config); "
        "paths relative to --home; `model`: a listed base model, `model:ID` or a folder",
    )
    notify: Notify = Field(default_factory=Notify)
    gpus: list[Annotated[int, Field(ge=0, le=1023)]] | None = Field(
        None,
        description="GPUs the job runs on (numbered as GET /api/resources lists them); [] the CPU only; "
        "unset: any free GPUs, one per process, on a machine that has them (else the CPU)",
    )
    processes: int = Field(
        1,
        ge=1,
        le=1024,
        description="processes; more than one runs the command under torchrun "
        "(finetune, pretrain, distill), one per GPU",
    )


class Move(BaseModel):
    direction: Literal["up", "down"] = Field(description="one place sooner (up) or later (down) in the queue")


class PredictRequest(BaseModel):
    texts: list[Annotated[str, Field(pattern=r"\S")]] = Field(
        min_length=1, max_length=100, description="texts to classify (1 to 100, none blank)"
    )


@router.get("/jobs", summary="All jobs, newest first, with status, progress and ETA (status=, q= filter them)")
def list_jobs(request: Request, status: str = "", q: str = ""):
    c = _console(request)
    with c.sessions() as s:
        return [c.job_summary(s, j) for j in catalog.find_jobs(s, status, q)]


@router.post(
    "/jobs",
    status_code=201,
    summary="Create a job (validated like the CLI; 422 names each bad field)",
    responses=_answers(422),
)
def create_job(request: Request, body: JobCreate):
    c = _console(request)
    job, errors = c.create_job(
        body.command,
        body.config,
        body.name,
        body.description,
        body.notify.model_dump(),
        body.gpus,
        body.processes,
        i18n.of(request),
    )
    if job is None:
        return _invalid(errors)
    with c.sessions() as s:
        return c.job_detail(s, s.get(Job, job.id))


@router.get(
    "/jobs/{job_id:int}", summary="A job: options, progress, events, models it produced", responses=_answers(404, 422)
)
def get_job(request: Request, job_id: JobId):
    c = _console(request)
    with c.sessions() as s:
        return c.job_detail(s, get_or_404(s, Job, job_id))


@router.get(
    "/jobs/{job_id:int}/log",
    summary="The last lines of the job's output",
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "the lines"},
        **_answers(404, 422),
    },
)
def get_log(request: Request, job_id: JobId, lines: int = Query(200, ge=1, le=5000)):
    c = _console(request)
    with c.sessions() as s:
        return PlainTextResponse(c.log_tail(get_or_404(s, Job, job_id), lines))


@router.get(
    "/jobs/{job_id:int}/curves",
    summary="log.jsonl rows by run and split, for loss and metric curves",
    responses=_answers(404, 422),
)
def get_curves(request: Request, job_id: JobId):
    c = _console(request)
    with c.sessions() as s:
        return catalog.curves(c.home / get_or_404(s, Job, job_id).folder)


@router.post(
    "/jobs/{job_id:int}/cancel",
    summary="Cancel: SIGTERM to the job's process group, SIGKILL after the grace period",
    responses=_answers(404, 409, 422),
)
def cancel_job(request: Request, job_id: JobId):
    c = _console(request)
    with c.sessions() as s:
        get_or_404(s, Job, job_id)
    try:
        return {"id": job_id, "status": c.cancel(job_id)}
    except Conflict as e:
        raise HTTPException(409, str(e)) from None


@router.post(
    "/jobs/{job_id:int}/retry",
    summary="Queue a failed, cancelled or interrupted job again (pretraining resumes)",
    responses=_answers(404, 409, 422),
)
def retry_job(request: Request, job_id: JobId):
    c = _console(request)
    with c.sessions() as s:
        get_or_404(s, Job, job_id)
    try:
        c.retry(job_id)
    except Conflict as e:
        raise HTTPException(409, str(e)) from None
    return {"id": job_id, "status": "queued"}


@router.post(
    "/jobs/{job_id:int}/move",
    summary="Move a queued job one place up or down the queue; answers the queue's job ids in order",
    responses=_answers(404, 409, 422),
)
def move_job(request: Request, job_id: JobId, body: Move):
    c = _console(request)
    try:
        return {"queue": c.move(job_id, body.direction)}
    except KeyError:
        raise HTTPException(404, f"job {job_id} does not exist") from None
    except Conflict as e:
        raise HTTPException(409, str(e)) from None


@router.get(
    "/resources",
    summary="The machine: CPU, memory, the home folder's disk, each GPU (model, memory, utilisation, the job using it)",
)
def resources(request: Request):
    return _console(request).resources()


@router.get(
    "/schema/{command}",
    summary="The create form's fields: type, default, range, help, presets",
    responses=_answers(422),
)
def schema(command: Annotated[Command, Path(description="a job type")]):
    return {
        "sections": [{"title": t, "fields": [vars(f) for f in fs]} for t, fs in settings.sections(command)],
        "presets": settings.presets(command),
    }


@router.get("/models", summary="My models: every model a job produced, with lineage and metrics")
def list_models(request: Request):
    c = _console(request)
    with c.sessions() as s:
        return [c.model_summary(m) for m in s.query(Model).order_by(Model.id.desc())]


@router.get(
    "/models/compare",
    summary="Several models side by side (ids=1&ids=2; unknown ids are left out)",
    responses=_answers(422),
)
def compare_models(
    request: Request, ids: Annotated[list[Annotated[int, Field(ge=1, le=MAX_ID)]], Query(min_length=1, max_length=50)]
):
    c = _console(request)
    with c.sessions() as s:
        return c.compare(s, ids)


@router.get("/models/{model_id:int}", summary="A model: kind, lineage, metrics", responses=_answers(404, 422))
def get_model(request: Request, model_id: ModelId):
    c = _console(request)
    with c.sessions() as s:
        return c.model_summary(get_or_404(s, Model, model_id))


@router.post(
    "/models/{model_id:int}/predict",
    summary="Try a classifier: labels and scores for each text",
    responses=_answers(404, 409, 422),
)
def predict(request: Request, model_id: ModelId, body: PredictRequest):
    c = _console(request)
    with c.sessions() as s:
        m = get_or_404(s, Model, model_id)
    try:
        return c.predict(m, body.texts)
    except Conflict as e:
        raise HTTPException(409, str(e)) from None
    except DomainLMError as e:
        return _invalid({"texts": str(e)})


@router.delete(
    "/models/{model_id:int}",
    summary="Delete a model's files and record (needs confirm=true)",
    responses=_answers(404, 409, 422),
)
def delete_model(
    request: Request,
    model_id: ModelId,
    confirm: Annotated[
        bool,
        Query(
            description="true: deleting removes the model's files, so it is asked for",
            json_schema_extra={"enum": [True]},
        ),
    ],
):
    c = _console(request)
    if not confirm:
        return _invalid({"confirm": "deleting removes the model's files; repeat with confirm=true"})
    try:
        return c.delete_model(model_id)
    except KeyError:
        raise HTTPException(404, f"model {model_id} does not exist") from None
    except (Conflict, PathError) as e:
        raise HTTPException(409, str(e)) from None


@router.get(
    "/models/{model_id:int}/download",
    summary="The model's folder as a zip",
    responses={200: {"content": {"application/zip": {}}, "description": "the zip"}, **_answers(404, 422)},
)
def download_model(request: Request, model_id: ModelId):
    c = _console(request)
    with c.sessions() as s:
        m = get_or_404(s, Model, model_id)
        path, kind, name = inside(c.home, m.path), m.kind, m.name
    if not path.exists():
        raise HTTPException(404, f"the files of model {model_id} are gone ({m.path})")
    archive = ship.zip_model(path, catalog.LINEAR_FILES if kind == "linear" else None, c.home / "downloads")
    return FileResponse(
        archive,
        media_type="application/zip",
        filename=f"{slug(name)}.zip",
        background=BackgroundTask(archive.unlink, missing_ok=True),
    )


@router.get(
    "/models/{model_id:int}/endpoint",
    summary="The model's `domainlm serve` endpoint: state, URL, token, /metrics",
    responses=_answers(404, 422),
)
def endpoint_status(request: Request, model_id: ModelId):
    c = _console(request)
    with c.sessions() as s:
        get_or_404(s, Model, model_id)
    return c.endpoints.status(model_id)


@router.post(
    "/models/{model_id:int}/endpoint",
    summary="Start `domainlm serve` for the model on 127.0.0.1 (a free port, a new token)",
    responses=_answers(404, 409, 422),
)
def start_endpoint(request: Request, model_id: ModelId):
    c = _console(request)
    try:
        return c.start_endpoint(model_id)
    except KeyError:
        raise HTTPException(404, f"model {model_id} does not exist") from None
    except DomainLMError as e:
        raise HTTPException(409, str(e)) from None


@router.delete(
    "/models/{model_id:int}/endpoint",
    summary="Stop the model's endpoint (SIGTERM, then SIGKILL)",
    responses=_answers(404, 422),
)
def stop_endpoint(request: Request, model_id: ModelId):
    return {"stopped": _console(request).endpoints.stop(model_id)}


def dataset_summary(d: Dataset) -> dict:
    return {
        "id": d.id,
        "name": d.name,
        "path": d.path,
        "kind": d.kind,
        "size_bytes": d.size_bytes,
        "rows": d.rows,
        "columns": d.columns,
        "distribution": d.distribution,
        "bad_rows": d.bad_rows,
        "note": d.error,
        "created_at": d.created_at.isoformat(timespec="seconds"),
    }


@router.get("/datasets", summary="Uploaded and registered datasets with their check results")
def list_datasets(request: Request):
    c = _console(request)
    with c.sessions() as s:
        return [dataset_summary(d) for d in s.query(Dataset).order_by(Dataset.id.desc())]


@router.get(
    "/datasets/{dataset_id:int}", summary="A dataset: rows, labels, bad rows by line", responses=_answers(404, 422)
)
def get_dataset(request: Request, dataset_id: DatasetId):
    c = _console(request)
    with c.sessions() as s:
        return dataset_summary(get_or_404(s, Dataset, dataset_id))


async def _checked_upload(request: Request, folder):
    """A streamed upload into `folder`, its CSRF token checked (a refused file is removed): fields, file, name."""
    c = _console(request)
    fields, tmp, filename = await receive_upload(request, folder, int(c.cfg.max_upload_mb * 1e6))
    supplied = request.headers.get("x-csrf-token") or fields.get("csrf")
    if not getattr(request.state, "csrf_checked", False) and not check_csrf(c.token, supplied):
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    if tmp is None:
        raise DomainLMError("no file in the upload (field `file`)")
    return fields, tmp, filename


async def upload(request: Request) -> Dataset:
    """Shared by the API and the datasets page: stream, check, keep (raises DomainLMError or UploadTooLarge)."""
    c = _console(request)
    fields, tmp, filename = await _checked_upload(request, c.home / "datasets")
    with c.sessions() as s:
        record = datasets.add_upload(s, c.home, tmp, filename, fields)
        s.commit()
        return record


def _upload_body(fields: dict, raw: bool) -> dict:
    """The request body of an upload route, for the OpenAPI document (the route streams it itself)."""
    form = {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary"},
            **{k: {"type": "string", "description": v} for k, v in fields.items()},
        },
    }
    content = {"multipart/form-data": {"schema": form}}
    if raw:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


DATASET_FIELDS = {
    "name": "the dataset's name (default: the file's)",
    "text_column": "default text",
    "label_column": "default label",
    "task": "multiclass or multilabel",
}


@router.post(
    "/datasets",
    status_code=201,
    summary="Upload a file (multipart field `file`, or a raw body with "
    "?filename=); optional text_column, label_column, task. Checked with the CLI's reader.",
    responses=_answers(413, 422),
    openapi_extra=_upload_body(DATASET_FIELDS, raw=True),
)
async def upload_dataset(
    request: Request,
    filename: Annotated[
        str | None, Query(description="the file's name, for a raw body (its suffix says the format)")
    ] = None,
):
    try:
        record = await upload(request)
    except UploadTooLarge as e:
        return JSONResponse({"errors": {"file": str(e)}}, status_code=413)
    except DomainLMError as e:
        return _invalid({"file": str(e)})
    return dataset_summary(record)


class Register(BaseModel):
    path: str = Field(pattern=r"\S", description="a file or corpus folder inside --home, or in one of --import-roots")
    name: str = ""
    text_column: str = "text"
    label_column: str = "label"
    task: Literal["multiclass", "multilabel"] = "multiclass"


@router.post(
    "/datasets/register",
    status_code=201,
    summary="Use a file or corpus store on the server: inside --home in place, inside one of --import-roots copied in",
    responses=_answers(404, 422),
)
def register_dataset(request: Request, body: Register):
    c = _console(request)
    try:
        return dataset_summary(c.register_dataset(body.path, body.model_dump()))
    except (DomainLMError, PathError) as e:
        return _path_problem(e)


class RegisterModel(BaseModel):
    path: str = Field(
        pattern=r"\S",
        description="a model folder on the server, inside --home or one of --import-roots: "
        "Hugging Face (config.json + weights), PaddleNLP (converted), or a vocabulary only (a tokenizer)",
    )
    name: str = ""


@router.post(
    "/models/register",
    status_code=201,
    summary="Bring a model folder from the server into my models "
    "(checked as the CLI checks --model; PaddleNLP folders converted)",
    responses=_answers(404, 422),
)
def register_model(request: Request, body: RegisterModel):
    c = _console(request)
    try:
        return c.register_model(body.path, body.name)
    except (DomainLMError, PathError) as e:
        return _path_problem(e)


async def model_upload(request: Request) -> dict:
    """Shared by the API and the models page: stream the archive, unpack, check, keep."""
    c = _console(request)
    fields, tmp, filename = await _checked_upload(request, c.home / "models")
    return c.upload_model(tmp, filename, fields.get("name", ""))


@router.post(
    "/models/upload",
    status_code=201,
    summary="Upload a model folder as .zip or .tar.gz (multipart field "
    "`file`, optional `name`); checked and converted like a registered folder",
    responses=_answers(413, 422),
    openapi_extra=_upload_body({"name": "the model's name (default: the archive's folder)"}, raw=False),
)
async def upload_model(request: Request):
    try:
        return await model_upload(request)
    except UploadTooLarge as e:
        return JSONResponse({"errors": {"file": str(e)}}, status_code=413)
    except DomainLMError as e:
        return _invalid({"file": str(e)})
