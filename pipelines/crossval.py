"""The cross-validation pipeline: preprocess -> crossval, the ``crossval`` / ``train-crossval@<name>`` stages of
``dvc.yaml`` on a cluster: video classification of a labelled raw dataset (one ``label`` and a ``patient_id`` per
video), k folds grouped by patient, SSL against scratch, linear probe and fine-tune, each fold's encoder pretrained
on that fold's training videos only. It reports and logs; it exports and deploys nothing (the training pipeline
does). The preprocess task runs the project image (the ``image`` parameter) and the crossval task its CUDA build
(``gpu_image``; see ``pipelines/training.py``).

    kfp dsl compile --py pipelines/crossval.py --output crossval.yaml
    sonossl pipeline submit --pipeline crossval --host ... --param dataset=s3://datasets/raw/lungs
"""

from kfp import dsl

from sonossl.kubeflow.components import cpu_step, gpu_step, with_s3_credentials
from sonossl.kubeflow.components.crossval import crossval as crossval_step
from sonossl.kubeflow.components.preprocess import preprocess
from sonossl.pipeline import GPU_IMAGE, IMAGE


@dsl.pipeline(name="sonossl-crossval",
              description="Video classification, k-fold cross-validation grouped by patient: SSL pretraining on "
                          "each fold's training videos against scratch, linear probe and fine-tune.")
def crossval(dataset: str, profile: str = "default", pretrain_epochs: int = 0, folds: int = 0,
             checkpoint_store: str = "", image: str = IMAGE, gpu_image: str = GPU_IMAGE):
    """Args:
        dataset: the raw dataset: s3://bucket/prefix, dvc://<path>?repo=<git url>&rev=<revision>, or a folder; its
            labels.csv needs a label and a patient_id for every video (crossval fails, naming the dataset and a
            video, before any training when they are missing).
        profile: parameter profile of params.yaml (tiny, default, gpu); its crossval block applies.
        pretrain_epochs: pretraining epochs of each fold's encoder; 0 keeps the profile's crossval.pretrain_epochs.
        folds: number of folds (at least 2); 0 keeps the profile's crossval.folds.
        checkpoint_store: an s3:// prefix where the crossval step mirrors its fold runs while it runs, so that a
            retry (or a later run of the same work) resumes instead of starting over; empty: none.
        image: the project image the preprocess step runs.
        gpu_image: its CUDA build (the same tag with -cuda), which the crossval step runs on its GPU.
    """
    # Always runs (a location does not identify its contents); its version id keys the cache of the step after it.
    pre = with_s3_credentials(preprocess(dataset=dataset, profile=profile, tasks=["planes"]))
    cpu_step(pre, "preprocess").set_caching_options(False).set_container_image(image)
    pre.set_retry(num_retries=2, backoff_duration="30s")
    cv = crossval_step(clips=pre.outputs["clips"], data_version=pre.outputs["Output"], profile=profile,
                       pretrain_epochs=pretrain_epochs, folds=folds, checkpoint_store=checkpoint_store)
    gpu_step(with_s3_credentials(cv)).set_container_image(gpu_image).set_display_name(
        "crossval (k folds by patient)")
