"""The local stack: Apache Kafka (KRaft), Arize Phoenix and an MLflow tracking server run as
plain background processes, with data, logs and pid files under one state folder.

    from processor.stack import LocalStack
    endpoints = LocalStack(load_stack_settings()).up()
"""

from processor.stack.kafka_nodes import KafkaNode
from processor.stack.layout import SERVICE_NAMES, ServiceName
from processor.stack.local_stack import LocalStack, ServiceStatus, StackEndpoints

__all__ = [
    "SERVICE_NAMES",
    "KafkaNode",
    "LocalStack",
    "ServiceName",
    "ServiceStatus",
    "StackEndpoints",
]
