# The lab (lab/lab) runs a short scenario against nginx round robin and resty.autoscale and writes a
# self-contained HTML report; headless Chromium loads it and every chart must have rendered data points.
# Also: the report needs nothing from the network, the run leaves no process behind, and the checker
# notices a chart without data (so this test can fail).
use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Temp qw(tempdir);
use Time::HiRes qw(time);

my $root = abs_path(dirname(__FILE__) . '/..');

my ($chromium) = grep { -x } map { ("/usr/bin/$_", "/usr/local/bin/$_") } qw(chromium chromium-browser google-chrome);
plan skip_all => 'chromium is not installed (apt-get install -y chromium): the lab report test needs a headless browser'
    unless $chromium;
plan skip_all => 'target/release/libresty_autoscale.so is not built (cargo build --release)'
    unless -f "$root/target/release/libresty_autoscale.so";
plan skip_all => 'nginx is not installed' unless -x '/usr/sbin/nginx';

my @CHARTS = qw(p50 p99 p999 errors share instances decisions load);
my $MIN_POINTS = 10;    # the smoke run has 12 one-second buckets per series and ~24 status polls

my $tmp = tempdir('lab-report-XXXXXX', TMPDIR => 1, CLEANUP => 1);
chmod 0755, $tmp;    # the gateway's nginx workers run as nobody
my $out = "$tmp/smoke";

# ---- run the smoke scenario (both variants) -------------------------------------------------------
my $port_base = 27500;    # the lab's range is 27000-27999; `make lab` uses 27000
my $t0 = time;
my $log = `cd $root && LAB_PORT_BASE=$port_base lab/lab smoke --out $out 2>&1`;
my $rc = $? >> 8;
my $elapsed = time - $t0;
is($rc, 0, 'lab/lab smoke exits 0') or diag($log);
cmp_ok($elapsed, '<=', 40, sprintf('both runs took <= 40 s (%.1f s)', $elapsed));
like($log, qr/^healthy\s+0-4\s+300 \|/m, 'the summary table is printed, one row per phase');
like($log, qr/report: \S*report\.html/, 'the report path is printed');

my $left = join '', grep { index($_, $out) >= 0 && !/\bps -eo\b/ } `ps -eo pid=,args=`;
is($left, '', 'nothing of the run is left running (ps)');

my $report = "$out/report.html";
ok(-s $report, 'report.html written') or BAIL_OUT("no report:\n$log");
my $html = do { local (@ARGV, $/) = $report; <> };
unlike($html, qr{\b(?:src|href)\s*=\s*["']?(?:https?:)?//}i, 'no external asset (src/href to another host)');
unlike($html, qr{<link\b|\@import|url\((?!#)}i, 'no stylesheet link, @import or url() other than to an element of the page');
for my $c (@CHARTS) {
    like($html, qr{<figure class="chart" id="chart-$c"}, "chart $c is in the report");
}

# ---- what Chromium renders ---------------------------------------------------------------------------
sub chromium {
    my (@args) = @_;
    my $profile = tempdir('lab-chromium-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    my @cmd = ('timeout', '90', $chromium, '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
               '--disable-background-networking', '--disable-component-update', '--disable-sync',
               "--user-data-dir=$profile", @args);
    my $cmd = join(' ', map { "'$_'" } @cmd) . ' 2>/dev/null';
    my $res = `$cmd`;
    return ($? >> 8, $res);
}

# chart id => { points => rendered polyline points, lines => polylines, size => WxH, attr_points => points
# in the polylines' `points` attributes of the DOM after the scripts ran }
sub rendered_charts {
    my ($file) = @_;
    my ($crc, $dom) = chromium('--virtual-time-budget=5000', '--dump-dom', "file://$file");
    my %charts;
    while ($dom =~ m{<figure\b([^>]*)>(.*?)</figure>}sg) {
        my ($attrs, $body) = ($1, $2);
        my ($id) = $attrs =~ /\bid="chart-(\w+)"/ or next;
        my %a = $attrs =~ /\bdata-rendered-(\w+)="([^"]*)"/g;
        my $pairs = 0;
        while ($body =~ /<polyline\b[^>]*\bpoints="([^"]*)"/g) {
            $pairs += () = $1 =~ /-?[\d.]+,-?[\d.]+/g;
        }
        $charts{$id} = { %a, attr_points => $pairs };
    }
    return ($crc, $dom, \%charts);
}

my ($crc, $dom, $charts) = rendered_charts($report);
is($crc, 0, 'chromium --dump-dom exits 0');
like($dom, qr/<body[^>]*\bdata-charts="${\ scalar @CHARTS}"/, 'the report script ran in the browser and saw every chart');
for my $c (@CHARTS) {
    my $ch = $charts->{$c} // {};
    cmp_ok($ch->{points} // 0, '>=', $MIN_POINTS, "chart $c rendered >= $MIN_POINTS data points ("
        . ($ch->{points} // 'none') . " in " . ($ch->{lines} // 0) . " lines)");
    cmp_ok($ch->{attr_points} // 0, '>=', $MIN_POINTS, "chart $c has >= $MIN_POINTS points in its polylines");
    like($ch->{size} // '', qr/^[1-9]\d*x[1-9]\d*$/, "chart $c has a non-empty size ($ch->{size})");
}

# ---- the check can fail: a copy of the report whose p99 chart lost its data -----------------------------
(my $broken = $html) =~ s{(<figure class="chart" id="chart-p99".*?</figure>)}{
    (my $f = $1) =~ s/(<polyline\b[^>]*\bpoints=")[^"]*"/$1"/g; $f }se;
isnt($broken, $html, 'made a copy of the report with an empty p99 chart');
open my $fh, '>', "$tmp/broken.html" or die $!;
print $fh $broken;
close $fh;
my (undef, undef, $bad) = rendered_charts("$tmp/broken.html");
is($bad->{p99}{points} // -1, 0, 'an empty chart is seen as 0 rendered points');
cmp_ok($bad->{p50}{points} // 0, '>=', $MIN_POINTS, 'while the other charts still count theirs');

# ---- a screenshot of one chart alone (what docs/lab-report.png is made with) ------------------------------
my ($src, undef) = chromium('--window-size=940,300', '--hide-scrollbars', "--screenshot=$tmp/chart.png",
                            "file://$report?only=p99");
my $png = -s "$tmp/chart.png" ? do { open my $p, '<:raw', "$tmp/chart.png"; local $/; <$p> } : '';
is(substr($png, 0, 8), "\x89PNG\r\n\x1a\n", 'chromium --screenshot of report.html?only=p99 wrote a PNG');
cmp_ok(length($png), '>', 10_000, 'the screenshot is not blank (' . length($png) . ' bytes)');

done_testing();
