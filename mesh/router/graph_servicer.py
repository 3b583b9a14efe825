"""gRPC edge of the inference-graph management API (mmesh.ModelMeshGraphs): protobuf <-> the
``GraphManagement`` core (``mesh.router.graph_management``)."""

from __future__ import annotations

import grpc

from mesh.gen.mmesh import graphs_pb2 as gp
from mesh.gen.mmesh import graphs_pb2_grpc as gp_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.router.graph_management import GraphManagement, GraphStatus
from mesh.transport.status import handled

ORIGIN = "router"


def graph_status_pb(status: GraphStatus) -> gp.GraphStatusInfo:
    out = gp.GraphStatusInfo(status=gp.GraphStatusInfo.GraphStatus.Value(status.status),
                             specJson=status.spec_json, owner=status.owner, updatedMs=status.updated_ms)
    for m in status.models:
        out.models.add(modelId=m.model_id, isVModel=m.is_vmodel, activeModelId=m.active_model_id,
                       status=mm.ModelStatusInfo.ModelStatus.Value(m.status.status))
    return out


class GraphsServicer(gp_grpc.ModelMeshGraphsServicer):
    def __init__(self, graphs: GraphManagement) -> None:
        self._g = graphs

    @handled(ORIGIN)
    async def setGraph(self, request: gp.SetGraphRequest, context: grpc.aio.ServicerContext) -> gp.GraphStatusInfo:
        return graph_status_pb(await self._g.set_graph(request.graphId, request.specJson, owner=request.owner))

    @handled(ORIGIN)
    async def getGraphStatus(
            self, request: gp.GetGraphStatusRequest, context: grpc.aio.ServicerContext) -> gp.GraphStatusInfo:
        return graph_status_pb(await self._g.graph_status(request.graphId))

    @handled(ORIGIN)
    async def deleteGraph(
            self, request: gp.DeleteGraphRequest, context: grpc.aio.ServicerContext) -> gp.DeleteGraphResponse:
        await self._g.delete_graph(request.graphId, owner=request.owner)
        return gp.DeleteGraphResponse()

    @handled(ORIGIN)
    async def listGraphs(
            self, request: gp.ListGraphsRequest, context: grpc.aio.ServicerContext) -> gp.ListGraphsResponse:
        entries, token = await self._g.list_graphs(prefix=request.prefix, page_size=request.pageSize,
                                                   page_token=request.pageToken)
        out = gp.ListGraphsResponse(nextPageToken=token)
        for e in entries:
            out.graphs.add(graphId=e.graph_id, nodes=e.nodes, models=list(e.models), updatedMs=e.updated_ms)
        return out
