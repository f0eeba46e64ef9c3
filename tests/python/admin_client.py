"""A client of cohort's Admin service that no cohort code wrote: grpcio with stubs generated
from protocol/proto/cohort/v1/admin.proto by grpcio-tools, over mutual TLS with an admin
certificate from `cohort provision`. Prints what it read as JSON.

Usage: admin_client.py STUBS_DIR ADDRESS ADMIN_DIR JOB_ID
"""

import json
import sys

stubs, address, admin_dir, job_id = sys.argv[1:5]
sys.path.insert(0, stubs)

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from cohort.v1 import admin_pb2, admin_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402


def read(name):
    with open(f"{admin_dir}/{name}", "rb") as f:
        return f.read()


creds = grpc.ssl_channel_credentials(
    root_certificates=read("ca.pem"),
    private_key=read("key.pem"),
    certificate_chain=read("cert.pem"),
)
# The coordinator's certificate names "coordinator", not the loopback address.
options = [("grpc.ssl_target_name_override", "coordinator")]
with grpc.secure_channel(address, creds, options=options) as channel:
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="cohort.v1.Admin"), timeout=10
    )
    # Server reflection: what grpcurl and grpcui use to find the services.
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    services = sorted(
        s.name for a in answers for s in a.list_services_response.service
    )
    admin = admin_pb2_grpc.AdminStub(channel)
    participants = admin.ListParticipants(admin_pb2.ListParticipantsRequest(), timeout=10)
    job = admin.GetJob(admin_pb2.JobRequest(job_id=job_id), timeout=10)
    try:
        admin.GetJob(admin_pb2.JobRequest(job_id="no-such-job"), timeout=10)
        missing = "OK"
    except grpc.RpcError as e:
        missing = e.code().name
    print(
        json.dumps(
            {
                "services": services,
                "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
                "participants": [
                    {"id": p.id, "status": p.status, "role": p.role}
                    for p in participants.participants
                ],
                "job": {
                    "id": job.job.id,
                    "state": job.job.state,
                    "rounds_completed": job.job.rounds_completed,
                    "rounds": [
                        {"round": r.round, "participants": list(r.participants)}
                        for r in job.rounds
                    ],
                },
                "missing_job": missing,
            }
        )
    )
