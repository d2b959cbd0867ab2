"""Stage `masks`: check the COCO data and images; write the masks, instance maps, object bank, manifest."""

from __future__ import annotations

import argparse

from pipeline.atomic import atomic_dir, write_json
from pipeline.config import load_params
from pipeline.data import coco
from pipeline.data.manifest import manifest_of, write_manifest
from pipeline.errors import run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="folder the jsons' file_names are relative to")
    parser.add_argument("--train-json", required=True)
    parser.add_argument("--test-json", required=True)
    parser.add_argument(
        "--out",
        required=True,
        help="masks folder (instance maps in its instances/, object bank objects.json), replaced as a whole",
    )
    parser.add_argument("--manifest", required=True, help="manifest JSON: classes, images, class presence")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    data = load_params(args.params).data

    on_bad = data.on_bad_annotation
    train = coco.load_coco(
        args.train_json, args.root, on_bad, require_annotations=True, unused=data.unused_categories
    )
    test = coco.load_coco(args.test_json, args.root, on_bad, classes_from=train)
    coco.check_same_classes(train, test)
    coco.check_pixel_cap(train, data.max_image_pixels)
    coco.check_pixel_cap(test, data.max_image_pixels)
    report = coco.unused_report(train)
    if report is not None:
        print(report)
    coco.check_images(test)
    with atomic_dir(args.out) as tmp:
        presence = coco.write_masks(train, tmp, data.overlap)
        write_json(tmp / "classes.json", {"classes": train.classes, "category_ids": train.category_ids})
    write_manifest(args.manifest, manifest_of(train, test, presence))

    problems = train.problems + test.problems
    print(
        f"masks: {len(train.images)} training images -> {args.out} (instance maps in {args.out}/instances), "
        f"{len(test.images)} test images checked; "
        f"annotations: {train.n_annotations} used, {len(problems)} skipped, "
        f"{train.clipped} clipped to the image" + (f" (first skipped: {problems[0]})" if problems else "")
    )


if __name__ == "__main__":
    run_main(main)
