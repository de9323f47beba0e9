"""thingsvision's documented extraction loop, timed; run by bench_extract.py with thingsvision's own Python.

Usage: python _thingsvision_child.py IMAGES MODEL SOURCE MODULE BATCH THREADS OUT_DIR
(does not import featx: thingsvision's pins may give it an older torch than featx supports)
"""

import json
import resource
import sys
import time
import warnings

warnings.simplefilter("ignore")


def main() -> None:
    images, model_name, source, module, batch, threads, out = sys.argv[1:8]
    import thingsvision
    import torch
    from thingsvision import get_extractor
    from thingsvision.utils.data import DataLoader, ImageDataset
    from thingsvision.utils.storing import save_features

    torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    extractor = get_extractor(model_name=model_name, source=source, device="cpu", pretrained=False)
    dataset = ImageDataset(
        root=images, out_path=out, backend=extractor.get_backend(), transforms=extractor.get_transformations()
    )
    batches = DataLoader(dataset=dataset, batch_size=int(batch), backend=extractor.get_backend())
    features = extractor.extract_features(batches=batches, module_name=module, flatten_acts=True)
    save_features(features, out_path=out, file_format="hdf5")
    seconds = time.perf_counter() - t0
    n = len(features)
    print(
        json.dumps(
            {
                "images": n,
                "seconds": seconds,
                "ips": n / seconds,
                "version": thingsvision.__version__,
                "torch": torch.__version__,
                "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            }
        )
    )


if __name__ == "__main__":
    main()
