"""The topics qrec uses, with their partition counts and configs (`qrec topics create`)."""

from __future__ import annotations

from services.bus.base import TopicSpec

CLICKSTREAM = "qrec.clickstream.v1"
RECOMMENDATIONS = "qrec.recommendations.v1"
USER_STATE = "qrec.user-state.v1"
TRANSITIONS = "qrec.transitions.v1"
MODEL = "qrec.model.v1"
DEAD_LETTER = "qrec.dead-letter.v1"
# Optional: item availability from the shop (CatalogueItem, key item_id), read by actors with
# --catalogue-topic.
CATALOGUE = "qrec.catalogue.v1"

SOURCE_HEADER = "qrec-source"
"""Header of a transition record naming its source (logged, recommendation), so a learner that does not
learn from that source skips the record without decoding it. Optional: records without it are decoded."""

# Model chunks are up to 1 MiB of base64; give the model topic head-room above Kafka's ~1 MB default.
MODEL_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def topic_specs(partitions: int = 6) -> list[TopicSpec]:
    """All qrec topics. Clickstream and recommendations share a partition count (co-partitioned)."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    compacted = {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1", "segment.ms": "600000"}
    return [
        TopicSpec(CLICKSTREAM, partitions),
        TopicSpec(RECOMMENDATIONS, partitions),
        TopicSpec(USER_STATE, partitions, dict(compacted)),
        TopicSpec(TRANSITIONS, partitions),
        TopicSpec(
            MODEL,
            1,
            {**compacted, "max.message.bytes": str(MODEL_MAX_MESSAGE_BYTES), "cleanup.policy": "compact"},
        ),
        TopicSpec(DEAD_LETTER, 1, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
        # Every actor reads the whole catalogue; one partition keeps that a single sequential read.
        TopicSpec(CATALOGUE, 1, dict(compacted)),
    ]
