"""The training pipeline: preprocess -> pretrain -> finetune (SSL and scratch, in parallel) -> evaluate -> export,
then deploy, only when the new model beats the serving champion on the configured metric.

It runs the main line of ``dvc.yaml`` (both-sequential pretraining; SSL and scratch fine-tuning for plane detection
and saliency), not the whole ablation, with the same library calls. The ``tasks`` parameter names the downstream
tasks: ``["planes"]`` for data without gaze maps (your own videos, as a rule), and the export then serves the
classifier and embeddings alone. The CPU tasks run the project image, a pipeline parameter (``image``, default
``ghcr.io/sonossl/sonossl:<package version>``), and the GPU steps (pretrain, the fine-tunes, and the model server
with ``serve_gpu``) its CUDA build (``gpu_image``, default the same tag with ``-cuda``), applied with
``set_container_image``: the components' ``base_image`` is fixed when they are compiled, and the KFP backend
resolves a parameter in a task's image only when the parameter is the whole reference (its driver substitutes the
parameter's value for the whole string), so each parameter is the full image reference, not a tag to append. With
``test_dataset``, the preprocess-test task turns an independent raw dataset into the test set every fine-tune run is
scored on, as ``dvc repro`` scores ``data/raw/sim_test``; without it, the runs are scored on the test split of
``dataset``.

    kfp dsl compile --py pipelines/training.py --output training.yaml
    sonossl pipeline submit --host https://kubeflow.example.org/pipeline --param dataset=s3://datasets/raw/sim
    sonossl pipeline submit --host ... --param dataset=s3://datasets/raw/lungs --param tasks=planes
"""

from kfp import dsl
from kfp.dsl import Model

from sonossl.kubeflow.components import cpu_step, gpu_step, with_s3_credentials
from sonossl.kubeflow.components.champion import champion
from sonossl.kubeflow.components.deploy import deploy
from sonossl.kubeflow.components.evaluate import evaluate
from sonossl.kubeflow.components.export import export
from sonossl.kubeflow.components.finetune import finetune
from sonossl.kubeflow.components.preprocess import preprocess, preprocess_test
from sonossl.kubeflow.components.pretrain import pretrain
from sonossl.pipeline import GPU_IMAGE, IMAGE
from sonossl.pipeline.steps import DOWNSTREAM_TASKS


@dsl.pipeline(name="sonossl-training",
              description="Self-supervised pretraining on ultrasound clips, fine-tuning (SSL and scratch), "
                          "evaluation, export, and deployment when the new model beats the serving one.")
def training(dataset: str, test_dataset: str = "", tasks: list = list(DOWNSTREAM_TASKS), profile: str = "default",
             pretrain_epochs: int = 0, pretrain_lr: float = 0.0, finetune_epochs: int = 0, finetune_lr: float = 0.0,
             image: str = IMAGE, gpu_image: str = GPU_IMAGE, deploy_metric: str = "planes.val.macro_f1",
             model_store: str = "s3://sonossl/models/export", service_name: str = "sonossl", namespace: str = "sonossl",
             service_account: str = "sonossl-s3", runtime: str = "sonossl", canary_percent: int = 0,
             serve_gpu: bool = False, deploy_dry_run: bool = False, checkpoint_store: str = "") -> Model:
    """Args:
        dataset: the raw dataset: s3://bucket/prefix, dvc://<path>?repo=<git url>&rev=<revision>, or a folder.
        test_dataset: an independent raw dataset (other patients or videos; same kinds of location) whose every
            labelled frame is the test set, as dvc repro scores data/raw/sim_test; empty scores the test split of
            dataset. Fine-tuning fails, naming the dataset, when it shares a patient or a video with dataset, or
            does not fit it (frame size, classes).
        tasks: the downstream tasks to fine-tune, each from the SSL encoder and from scratch: ["planes",
            "saliency"], or ["planes"] for data without gaze maps (then preprocess fails, naming the dataset, when
            saliency is asked of data that has none, before any GPU step starts).
        profile: parameter profile of params.yaml (tiny, default, gpu).
        pretrain_epochs: pretraining epochs; 0 keeps the profile's.
        pretrain_lr: pretraining learning rate; 0 keeps the profile's.
        finetune_epochs: fine-tuning epochs (planes and saliency); 0 keeps the profile's.
        finetune_lr: fine-tuning learning rate; 0 keeps the profile's.
        image: the project image the CPU steps run (and the model server); change its tag to run another
            release, e.g. ghcr.io/sonossl/sonossl:0.2.0.
        gpu_image: the same release's CUDA build, which the GPU steps run (and the model server with serve_gpu),
            e.g. ghcr.io/sonossl/sonossl:0.2.0-cuda; a GPU step fails at once, naming it, when its torch cannot
            use the GPU it was given.
        deploy_metric: metric of the deploy gate, as the InferenceService annotates it: a validation score where
            higher is better (planes.val.macro_f1, planes.val.accuracy, saliency.val.cc...). Like every other model
            choice here, promotion does not look at the test videos; a test score or KLD is refused.
        model_store: s3:// prefix the deployed model is uploaded under (<model_store>/<model version>).
        service_name: the InferenceService to create or update.
        namespace: its namespace.
        service_account: its service account (S3 access for the storage initializer).
        runtime: the ServingRuntime's name.
        canary_percent: traffic share of a new model (0: all at once).
        serve_gpu: serve on a GPU node.
        deploy_dry_run: upload nothing, apply nothing: only render the InferenceService (run-local sets it).
        checkpoint_store: an s3:// prefix where pretrain and every fine-tune mirror their output folders while they
            run, so that a retry (or a later run of the same work) resumes from the last epoch instead of starting
            over; empty: none (KFP keeps no output of a failed attempt).
    """
    # A location does not identify its contents (an S3 prefix can change), so preprocess always runs; the version
    # id it returns is a parameter of every later step, so none is served a result of other data. (The backend
    # also keys its cache on the input artefacts, new in every run: the checkpoint store is what skips done work.)
    pre = with_s3_credentials(preprocess(dataset=dataset, profile=profile, tasks=tasks)).set_caching_options(False)
    cpu_step(pre, "preprocess").set_container_image(image).set_retry(num_retries=2, backoff_duration="30s")
    clips, version = pre.outputs["clips"], pre.outputs["Output"]

    pt = pretrain(clips=clips, data_version=version, profile=profile, epochs=pretrain_epochs,
                  learning_rate=pretrain_lr, checkpoint_store=checkpoint_store)
    gpu_step(with_s3_credentials(pt)).set_container_image(gpu_image).set_display_name("pretrain (both-sequential)")

    # The test set: every frame of test_dataset when given (as dvc repro scores data/raw/sim_test), else the test
    # split of dataset (the task then only records that there is no independent test set).
    tst = preprocess_test(dataset=test_dataset, profile=profile, tasks=tasks)
    tst = with_s3_credentials(tst).set_caching_options(False)
    cpu_step(tst, "preprocess").set_container_image(image).set_retry(num_retries=2, backoff_duration="30s")
    test = {"test_clips": tst.outputs["clips"], "test_data_version": tst.outputs["Output"]}

    # One fine-tune per task from the SSL encoder, and one from scratch (no encoder: these wait only for the data);
    # evaluate and export collect each loop's outputs, whatever tasks ran (each its own dsl.Collected: compiling
    # rewrites one in place for its consumer). Collecting artifacts needs a KFP backend with kubeflow/pipelines#11725.
    finetunes = {}
    for init, encoder in [("ssl", {"encoder": pt.outputs["encoder"]}), ("scratch", {})]:
        with dsl.ParallelFor(tasks, name=f"{init}-finetunes") as task:
            ft = finetune(clips=clips, data_version=version, profile=profile, task=task, name=f"{init}-{task}",
                          epochs=finetune_epochs, learning_rate=finetune_lr, checkpoint_store=checkpoint_store,
                          **encoder, **test)
            gpu_step(with_s3_credentials(ft)).set_container_image(gpu_image).set_display_name(f"finetune ({init})")
        finetunes[init] = ft.outputs["model"]

    ev = evaluate(encoder=pt.outputs["encoder"], **{k: dsl.Collected(v) for k, v in finetunes.items()})
    cpu_step(ev, "evaluate").set_container_image(image)
    exp = export(clips=clips, data_version=version, profile=profile, metric=deploy_metric,
                 **{k: dsl.Collected(v) for k, v in finetunes.items()})
    cpu_step(exp, "export").set_container_image(image).after(ev)  # a report for every model that may be served

    gate = champion(name=service_name, namespace=namespace, metric=deploy_metric, score=exp.outputs["score"])
    cpu_step(gate, "control").set_container_image(image).set_caching_options(False)  # the champion can change
    with dsl.If(gate.output == "deploy", name="beats-champion"):
        dep = deploy(model=exp.outputs["model"], model_store=model_store, name=service_name, namespace=namespace,
                     image=image, gpu_image=gpu_image, service_account=service_account, runtime=runtime,
                     canary_percent=canary_percent,
                     gpu=serve_gpu, dry_run=deploy_dry_run)
        cpu_step(with_s3_credentials(dep), "control").set_container_image(image).set_caching_options(False)
        dep.set_retry(num_retries=2, backoff_duration="30s")
    return exp.outputs["model"]
