use strict;
use warnings;

# The runner must be able to fail: run t/selftest/fails.t-in, whose blocks
# hold deliberately wrong expectations, through prove (own servroot, own
# port) and check that exactly the wrong expectations are reported.

use Cwd qw(getcwd);
use File::Copy qw(copy);
use File::Temp qw(tempdir);
use IO::Socket::INET;
use IPC::Run qw(run timeout);
use Test::More;

my $repo = getcwd();
my $dir = tempdir('autoscale-selftest-XXXXXX', TMPDIR => 1, CLEANUP => 1);
copy("$repo/t/selftest/fails.t-in", "$dir/fails.t") or die "copy: $!";

# a free port of our own, clear of the ranges other suites use
my $port;
for (1 .. 100) {
    my $try = 20000 + int rand 12000;
    my $sock = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $try, Proto => 'tcp')
        or next;
    close $sock;
    $port = $try;
    last;
}
die "no free port\n" unless $port;

local $ENV{TEST_NGINX_SERVROOT}    = "$dir/servroot";
local $ENV{TEST_NGINX_SERVER_PORT} = $port;
delete local $ENV{TEST_NGINX_PORT};

my ($out, $err) = ('', '');
run(['prove', '-v', "$dir/fails.t"], \undef, \$out, \$err, timeout(120));
my $status = $?;

# "ok" or "not ok" for each check of fails.t-in, by block and check
my @expected = (
    ['not ok', qr/TEST 1: wrong status - status code ok$/],
    ['ok',     qr/TEST 1: wrong status - response_body - response is expected/],
    ['ok',     qr/TEST 2: wrong body - status code ok$/],
    ['not ok', qr/TEST 2: wrong body - response_body - response is expected/],
    ['ok',     qr/TEST 3: .* - status code ok$/],
    ['ok',     qr/TEST 3: .* - pattern "present-marker" matches a line in error\.log/],
    ['not ok', qr/TEST 3: .* - pattern "absent-marker" should match a line in error\.log/],
    ['ok',     qr/TEST 4: .* - status code ok$/],
    ['not ok', qr/TEST 4: .* - pattern "\[error\]" should not match any line in error\.log/],
    ['ok',     qr/TEST 4: .* - pattern "never-logged-marker" does not match a line in error\.log/],
    ['not ok', qr/TEST 5: must_die, but nginx starts - die as expected$/],
    ['ok',     qr/TEST 6: .* - status code ok$/],
    ['not ok', qr/TEST 6: .* - response_body_like - response is expected/],
    ['ok',     qr/TEST 7: .* - status code ok$/],
    ['not ok', qr/TEST 7: .* - header X-Fruit ok$/],
    ['ok',     qr/TEST 8: .* - status code ok$/],
    ['not ok', qr/TEST 8: .* - grep_error_log_out/],
    ['not ok', qr/TEST 9: client timeout - status code ok$/],
    ['ok',     qr/TEST 10: all right - status code ok$/],
    ['ok',     qr/TEST 10: all right - response_body - response is expected/],
);

my @results = $out =~ /^(ok|not ok) \d+ - (.*)$/mg;
my %got;
while (my ($verdict, $name) = splice @results, 0, 2) {
    my @hits = grep { $name =~ $expected[$_][1] } 0 .. $#expected;
    is(scalar @hits, 1, "exactly one expectation for: $name");
    $got{$hits[0]} = $verdict if @hits == 1;
}
for my $i (0 .. $#expected) {
    my ($verdict, $re) = @{ $expected[$i] };
    is($got{$i} // 'missing', $verdict, "$verdict: $re");
}

isnt($status, 0, 'prove exits with failure');
like($out, qr/^Failed 9\/20 subtests/m, 'prove counts 9 failures of 20');
like($out, qr/^Result: FAIL$/m, 'prove says FAIL');

# the bundled runner's diagnostics: a diff, and the tail of error.log
SKIP: {
    skip 'diagnostics of the bundled runner', 2
        if !$ENV{AUTOSCALE_MINI_RUNNER} && grep { -f "$_/Test/Nginx/Socket/Lua.pm" } @INC;
    like($err, qr/^# -line two\n# \+line 2$/m, 'a wrong body is shown as a diff');
    like($err, qr/TEST 4: .* - last non-debug lines of nginx's logs.*\n(?:# .*\n)*# .*\[error\] .*boom/,
        "the tail of error.log is shown");
}

is_deeply([nginx_processes($dir)], [], 'no nginx of the selftest left running');

done_testing();

# live processes whose command line mentions $dir (zombies have none)
sub nginx_processes {
    my $dir = shift;
    opendir my $dh, '/proc' or return;
    my @found;
    for my $pid (grep { /^\d+$/ } readdir $dh) {
        open my $fh, '<', "/proc/$pid/cmdline" or next;
        my $cmd = do { local $/; <$fh> } // '';
        push @found, $pid if $cmd =~ /nginx/ && index($cmd, $dir) >= 0;
    }
    return @found;
}
