"""The pure core: decoding, attribution, windows, aggregates. No faust, Kafka or HTTP here."""
