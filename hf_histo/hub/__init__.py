"""Hub-ready checkpoint folders: shipped code, model card and upload from the main process."""

from .bundle import bundle_code
from .card import build_model_card, write_model_card
from .folder import run_data_info, save_for_hub, save_run
from .segmentation_card import write_segmentation_card
from .upload import REQUIRED_FILES, HubUnavailableError, hub_upload_files, push_folder_to_hub

__all__ = [
    "REQUIRED_FILES",
    "HubUnavailableError",
    "build_model_card",
    "bundle_code",
    "hub_upload_files",
    "push_folder_to_hub",
    "run_data_info",
    "save_for_hub",
    "save_run",
    "write_model_card",
    "write_segmentation_card",
]
