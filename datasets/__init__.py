from .bases import DATASETS, BaseDataset, DatasetError, EvalSplit, build_dataset, register_dataset

__all__ = ["DATASETS", "BaseDataset", "DatasetError", "EvalSplit", "build_dataset", "register_dataset"]
