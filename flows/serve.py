"""The runner of ``planrun up``: serves the ``planrun/plan-runner`` deployment.

``python -m planrun.flows.serve`` registers the deployment (the same one ``prefect.yaml``
declares for workers on other machines) and executes each of its runs in a process of its
own, as Prefect's ``serve()`` does. Set ``PREFECT_RUNNER_POLL_FREQUENCY`` low (``planrun
up`` sets 1 s): a submitted run waits for the runner's next poll.
"""

from __future__ import annotations

from planrun.flows.plan_flow import plan_flow

DEPLOYMENT = "plan-runner"
#: What clients pass to ``run_deployment``: flow name / deployment name.
DEPLOYMENT_PATH = f"planrun/{DEPLOYMENT}"


def main() -> None:
    plan_flow.serve(name=DEPLOYMENT, tags=["planrun"], print_starting_message=False,
                    description="Runs planrun plans submitted with `planrun submit` or "
                                "POST /v1/runs; parameters: plan (data), inputs.")


if __name__ == "__main__":
    main()
