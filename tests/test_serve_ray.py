"""`vlmdeploy serve --ray`: the same app as Ray Serve replicas on a local Ray instance the test
starts and stops; the replicas answer the shapes questions as the runtime does."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from vlmdeploy.demo.scorecard import PROMPT  # noqa: E402
from vlmdeploy.runtime.vlm import VLM  # noqa: E402
from vlmdeploy.serve.app import ServeConfig  # noqa: E402
from vlmdeploy.serve.ray import ray_application  # noqa: E402

from test_serve import MODEL, QUESTIONS, question_messages, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def ray_server(shapes_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(str(shapes_dir), model_name=MODEL, threads=1, max_num_seqs=4)
        serve.run(ray_application(config, replicas=2, cpus_per_replica=0.5), name="vlmdeploy", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_replicas_answer_as_the_runtime(ray_server, shapes_dir):
    def healthy():
        try:
            return ray_server.with_options(timeout=5).models.list().data[0].id == MODEL
        except (openai.APIConnectionError, openai.APIStatusError):
            return False

    wait_until(healthy, "the replicas to load")
    status = serve.status().applications["vlmdeploy"].deployments["vlmdeploy"]
    assert status.replica_states == {"RUNNING": 2}

    def ask(job):
        image, question, _ = job
        r = ray_server.chat.completions.create(model=MODEL, messages=question_messages(image, question),
                                               temperature=0, max_tokens=32)
        return r.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, QUESTIONS[:8]))
    vlm = VLM.load(shapes_dir)
    assert got == [vlm.generate(PROMPT.format(question=q), [im], max_new_tokens=32).text for im, q, _ in QUESTIONS[:8]]
