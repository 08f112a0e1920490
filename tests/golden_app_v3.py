"""An incompatible change to tests/golden_app.OrderFlow: it ships before charging."""

from __future__ import annotations

from golden_app import Order, charge, ship
from tether import workflow


@workflow.defn(name="OrderFlow")
class OrderFlowV3:
    @workflow.run
    async def run(self, order: Order) -> dict[str, str]:
        parcel = await workflow.execute_activity(ship, order, start_to_close_timeout=5)
        receipt = await workflow.execute_activity(charge, order, start_to_close_timeout=5)
        return {"receipt": receipt, "parcel": parcel, "notes": ""}
