"""The daily usage sums agree with the requests they sum, however often rebuilt."""

from django.db.models import Sum
from django.utils import timezone

from monitoring import rollup
from monitoring.models import UsageDaily, UsageDailyTotal, UsageDailyUser
from tests import test_monitoring_pages as pages
from tests.test_monitoring_pages import make_generation

cast = pages.cast  # the quick (rolled back) cast of the page tests
default_model = pages.default_model


def _sums(model):
    return model.objects.aggregate(r=Sum("requests"), t=Sum("completion_tokens"))


def test_the_three_rollups_agree_and_a_rebuild_changes_nothing(cast, default_model):
    for user, source in ((cast.alice, "chat"), (cast.alice, "api"), (cast.bob, "job")):
        make_generation(user, default_model, source=source, team=cast.red)
    make_generation(cast.charlie, default_model, days_ago=2)
    expected = {"r": 4, "t": 200}
    assert _sums(UsageDaily) == _sums(UsageDailyTotal) == _sums(UsageDailyUser) == expected
    today = timezone.localdate()
    rollup.refresh(today - timezone.timedelta(days=5), today)
    rollup.refresh(today - timezone.timedelta(days=5), today)
    assert _sums(UsageDaily) == _sums(UsageDailyTotal) == _sums(UsageDailyUser) == expected
    assert UsageDailyUser.objects.filter(user=cast.alice).count() == 1
    assert UsageDaily.objects.filter(user=cast.alice).count() == 2, "one row per source"


def test_a_running_generation_is_summed_only_once_it_ends(cast, default_model):
    gen = make_generation(cast.alice, default_model, state="running")
    assert not UsageDaily.objects.exists()
    gen.state = "done"
    gen.save()
    rollup.refresh_for(gen)
    assert UsageDaily.objects.get().requests == 1
