"""What every admin route shares: paging parameters, the store as a dependency, and the API error
for each refusal of the store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, ParamSpec, TypeVar

from fastapi import Depends, Header, Query, Request

from lethe.gateway.api.errors import APIError
from lethe.gateway.store import (
    DuplicateTargetName,
    InvalidCursor,
    JobFinished,
    JobNotFound,
    NothingToRollBack,
    NotServing,
    ServingChanged,
    Store,
    StoreError,
    TargetNotFound,
    VersionMismatch,
)

Params = ParamSpec("Params")
Result = TypeVar("Result")

Limit = Annotated[int, Query(ge=1, le=500, description="Items per page.")]
After = Annotated[str | None, Query(description="`next_cursor` of the previous page.")]
IfMatch = Annotated[
    str | None, Header(description="The version the change is based on; another current version is a 412.")
]

# (status, type, param, code) of each refusal of the store.
_REFUSALS: dict[type[StoreError], tuple[int, str, str | None, str]] = {
    TargetNotFound: (404, "not_found_error", None, "target_not_found"),
    DuplicateTargetName: (409, "invalid_request_error", "name", "target_name_conflict"),
    VersionMismatch: (412, "invalid_request_error", "If-Match", "version_mismatch"),
    InvalidCursor: (400, "invalid_request_error", "after", "invalid_cursor"),
    JobNotFound: (404, "not_found_error", None, "job_not_found"),
    JobFinished: (409, "invalid_request_error", None, "job_finished"),
    ServingChanged: (409, "invalid_request_error", None, "serving_checkpoint_changed"),
    NotServing: (409, "invalid_request_error", None, "checkpoint_not_serving"),
    NothingToRollBack: (409, "invalid_request_error", None, "nothing_to_roll_back"),
}


def refusal(error: StoreError) -> APIError:
    """The API error for a store refusal."""
    status, type_, param, code = _REFUSALS[type(error)]
    return APIError(status, str(error), type_=type_, param=param, code=code)


def store(request: Request) -> Store:
    return request.app.state.store


StoreDep = Annotated[Store, Depends(store)]


async def call_store(
    function: Callable[Params, Result], *args: Params.args, **kwargs: Params.kwargs
) -> Result:
    """Run a blocking store call off the event loop and turn its refusals into API errors."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except StoreError as error:
        raise refusal(error) from error
