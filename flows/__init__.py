"""The Prefect side of mnist-flow: flows and tasks that compose the `mnist_flow` library.

`mnist` (flows/mnist.py, deployment `train`), `mnist-trials` (flows/trials.py, deployment `worker`),
`mnist-data-check` (flows/datacheck.py); flows/serve.py serves them without a work pool, and
flows/automations.py creates the service's automations (`make deploy`).
"""
