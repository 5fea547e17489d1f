"""confer: a Python client for federated differential-privacy analytics.

Connect to a coordinator, run DP SQL, read results with their intervals
and release metadata, check costs before spending, follow training jobs
and load the trained models into PyTorch::

    import confer

    with confer.connect("http://127.0.0.1:50051", token="cft_...", study="demo") as client:
        result = client.sql(
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) "
            "gender_concept_id, COUNT(*) AS persons FROM person GROUP BY gender_concept_id"
        )
        print(result.df)              # persons, persons_ci_low, persons_ci_high
        print(result.release)         # cost per site, sites, mechanism, confidence

``confer.local_network()`` starts a federation on this machine for
tutorials and tests.
"""

from .client import Catalog, Client, Column, Domain, Study, Table, User, connect
from .errors import (
    AuthenticationError,
    AuthError,
    BudgetError,
    ConferError,
    ConfigurationError,
    DeadlineExceededError,
    InternalError,
    JobFailedError,
    LocalNetworkError,
    NotFoundError,
    PermissionDeniedError,
    RefusedError,
    UnavailableError,
)
from .local import LocalNetwork, find_binary, local_network
from .models import load_torch_model
from .results import ColumnRelease, Cost, ExplainedAggregate, Explanation, QueryResult, Release
from .training import Job, JobStatus, load_job_spec

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "AuthenticationError",
    "BudgetError",
    "Catalog",
    "Client",
    "Column",
    "ColumnRelease",
    "ConferError",
    "ConfigurationError",
    "Cost",
    "DeadlineExceededError",
    "Domain",
    "ExplainedAggregate",
    "Explanation",
    "InternalError",
    "Job",
    "JobFailedError",
    "JobStatus",
    "LocalNetwork",
    "LocalNetworkError",
    "NotFoundError",
    "PermissionDeniedError",
    "QueryResult",
    "RefusedError",
    "Release",
    "Study",
    "Table",
    "UnavailableError",
    "User",
    "__version__",
    "connect",
    "find_binary",
    "load_job_spec",
    "load_torch_model",
    "local_network",
]
