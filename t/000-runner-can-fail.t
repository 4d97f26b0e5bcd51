use strict;
use warnings;

# The runner must be able to fail: run t/selftest/fails.t-in, whose blocks
# hold deliberately wrong expectations, through prove (own servroot, own
# port) and check that exactly the wrong expectations are reported; then run
# each of the other t/selftest/*.t-in files, each with a block that
# Test::Nginx refuses, and check that it is refused, with the message of the
# runner in use (the bundled runner or Test::Nginx: the counts and verdicts
# here hold for both).

use Cwd qw(getcwd);
use File::Copy qw(copy);
use File::Temp qw(tempdir);
use IO::Socket::INET;
use IPC::Run qw(run timeout);
use Test::More;

my $repo = getcwd();
my $dir = tempdir('autoscale-selftest-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $real = !$ENV{AUTOSCALE_MINI_RUNNER} && grep { -f "$_/Test/Nginx/Socket/Lua.pm" } @INC;

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

# ($status, $stdout, $stderr) of prove -v on a copy of t/selftest/$name.t-in
sub selftest {
    my $name = shift;
    copy("$repo/t/selftest/$name.t-in", "$dir/$name.t") or die "copy: $!";
    my ($out, $err) = ('', '');
    run(['prove', '-v', "$dir/$name.t"], \undef, \$out, \$err, timeout(120));
    return ($?, $out, $err);
}

my ($status, $out, $err) = selftest('fails');

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
    ['not ok', qr/^ERROR: client socket timed out - .*TEST 9: client timeout$/],
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
# the client timeout is a test more than the plan of 20, and fails the file
like($out, qr/^Failed 10\/20 subtests/m, 'prove counts 10 failures of 20');
like($out, qr/^Result: FAIL$/m, 'prove says FAIL');

# the bundled runner's diagnostics: a diff, and the tail of error.log
SKIP: {
    skip 'diagnostics of the bundled runner', 2 if $real;
    like($err, qr/^# -line two\n# \+line 2$/m, 'a wrong body is shown as a diff');
    like($err, qr/TEST 4: .* - last non-debug lines of nginx's logs.*\n(?:# .*\n)*# .*\[error\] .*boom/,
        "the tail of error.log is shown");
}

# Blocks that Test::Nginx refuses: [file, what the bundled runner says, what Test::Nginx says (undef: it accepts
# the block, which the bundled runner cannot run as Test::Nginx would)]. Each bails out, but for the duplicate
# directive, which the bundled runner reports as a failed test.
my $bail = qr/^Bailout called\.  Further testing stopped:  \S+ TEST \d+: [^\n]* - /m;
my @refused = (
    ['no-config-first',
        qr/$bail\QNo '--- config' section specified and could not get previous one.\E/,
        qr/$bail\QNo '--- config' section specified and could not get previous one.\E/],
    ['no-config-later',
        qr/${bail}No '--- config' section: Test::Nginx would not start nginx for this block/,
        qr/${bail}Request line should be non-empty/],
    ['no-request',
        qr/${bail}No '--- request' section \(Test::Nginx: "Request line should be non-empty"\)/,
        qr/${bail}Request line should be non-empty/],
    ['bad-request-line',
        qr/${bail}Request line is not valid\. Should be 'meth \[url \[version\]\]' but got "GET \/t HTTP\/1\.1 extra/,
        qr/${bail}Request line is not valid\. Should be 'meth \[url \[version\]\]' but got "GET \/t HTTP\/1\.1 extra/],
    ['duplicate-directive',
        qr/^not ok 1 - .* - cannot start nginx: .*\n# .*"fastcgi_temp_path" directive is duplicate in .*nginx\.conf:\d+\n(?:# .*\n)*#     \(the runner writes fastcgi_temp_path itself, as Test::Nginx does: leave it out of the block\)$/m,
        qr/${bail}Cannot start nginx using command/],
    ['unsupported-section',
        qr/${bail}--- raw_request is not supported by the bundled runner \(t\/Autoscale\/Runner\.pm\); run this file with Test::Nginx/,
        undef],
);
for my $case (@refused) {
    my ($name, $mini, $tn) = @$case;
    my $want = $real ? $tn : $mini;
    SKIP: {
        skip "$name: Test::Nginx runs such a block", 2 unless $want;
        my ($st, $o, $e) = selftest($name);
        isnt($st, 0, "$name: prove exits with failure");
        like($o, $want, "$name: refused with the runner's message") or diag($o, $e);
    }
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
